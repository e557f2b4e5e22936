"""LoRA variants as pure tensor functions: DoRA's weight norm, PiSSA and OLoRA
initialisation, the conversion of a PiSSA/OLoRA adapter to a plain LoRA, and the
check that refuses peft config keys loralab does not implement.

Every formula follows peft 0.21 (``peft/tuners/lora/{layer,dora,model}.py``) so
that adapters move between the two unchanged; where peft is wrong for a layout
(OLoRA on GPT-2's Conv1D) the docstring says what is done instead.
"""

from __future__ import annotations

import re

import torch

from loralab.errors import LoralabError

# peft's init_lora_weights values loralab implements: True is nn.Linear's
# Kaiming-uniform A with B = 0 (the LoRA paper); "gaussian" draws A ~ N(0, 1/r);
# False leaves A and B random (peft's "no-op is off", for tests).
INIT_HINT = "Fix: use init_lora_weights default|gaussian|pissa|pissa_niter_16|olora."
MUTATED_INITS = ("pissa", "olora")  # inits that move part of W into A and B


def parse_init(value) -> bool | str:
    """peft's ``init_lora_weights`` value, normalised: True, False, "gaussian",
    "pissa", "pissa_niter_K" (K >= 1) or "olora"."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "default", "kaiming"):
        return True
    if text == "false":
        return False
    if text in ("gaussian", "pissa", "olora"):
        return text
    match = re.fullmatch(r"pissa_niter_(\d+)", text)
    if match and int(match.group(1)) >= 1:
        return text
    raise LoralabError(f"init_lora_weights {value!r} is not one loralab implements.",
                       hint=INIT_HINT)


def is_mutated_init(init) -> bool:
    """PiSSA and OLoRA take the adapter's start out of the base weight."""
    return isinstance(init, str) and init.split("_niter_")[0] in MUTATED_INITS


# ---- DoRA (Liu et al., 2024) ------------------------------------------------

def dora_weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``||W + ΔW||`` per output feature, W and ΔW (out, in); returns (out,).

    peft's ``DoraLinearLayer.get_weight_norm``: the L2 norm over the input
    dimension of each output row (the paper's column norm of the (in, out) W).
    """
    return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype)  # (out,)


def dora_merged(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor):
    """``m / ||W + ΔW|| * (W + ΔW)`` (DoRA eq. 5), W and ΔW (out, in), fp32."""
    combined = weight.float() + delta.float()  # (out, in)
    norm = torch.linalg.norm(combined, dim=1)  # (out,)
    return (magnitude.float() / norm).view(-1, 1) * combined


# ---- PiSSA (Meng et al., 2024) and OLoRA (Büyükakyüz, 2024) -------------------

def pissa_factors(weight: torch.Tensor, r: int, scaling: float, init: str):
    """A (r, in) and B (out, r) from the top-r singular triplets of W (out, in),
    with ``scaling * B @ A = U_r S_r V_r^T`` (peft's ``pissa_init``).

    ``pissa_niter_K`` uses torch's randomized SVD with K subspace iterations
    (Halko et al., 2011), as peft does: minutes become seconds on large layers.
    """
    w = weight.float()
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        Ur, Sr, Vhr = U[:, :r], S[:r] / scaling, Vh[:r]
    else:
        niter = int(init.split("_niter_")[-1])
        Ur, Sr, V = torch.svd_lowrank(w, r, niter=niter)  # (out, r), (r,), (in, r)
        Sr, Vhr = Sr / scaling, V.t()
    root = torch.diag(torch.sqrt(Sr))  # (r, r)
    return (root @ Vhr).contiguous(), (Ur @ root).contiguous()  # A (r, in), B (out, r)


def olora_factors(weight: torch.Tensor, r: int):
    """A = R[:r] (r, in), B = Q[:, :r] (out, r) from W = QR (peft's ``olora_init``).

    W is taken (out, in) here; peft QR-decomposes the stored weight, which for
    GPT-2's (in, out) Conv1D gives factors of the wrong shape unless in == out.
    """
    Q, R = torch.linalg.qr(weight.float())  # (out, k), (k, in)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def mutated_factors(weight: torch.Tensor, r: int, scaling: float, init: str):
    """(A0, B0) for a PiSSA or OLoRA init of W (out, in); the residual base is
    ``W - scaling * B0 @ A0``."""
    if init == "olora":
        return olora_factors(weight, r)
    return pissa_factors(weight, r, scaling, init)


def as_plain_lora(A, B, A0, B0):
    """The trained PiSSA/OLoRA pair as a rank-2r LoRA relative to the original W.

    ``W_res + s·BA = W + s·(BA - B0A0) = W + s·[B, -B0] @ [A; A0]`` (peft's
    ``subtract_mutated_init``); with alpha doubled too, s is unchanged.
    """
    return torch.cat([A, A0.to(A.dtype)], dim=0), torch.cat([B, -B0.to(B.dtype)], dim=1)


def converted_alpha(alpha: float, use_rslora: bool) -> float:
    """alpha for rank 2r with the same scaling (peft's ``save_pretrained``)."""
    return alpha * 2 ** 0.5 if use_rslora else alpha * 2


# ---- peft config keys ---------------------------------------------------------

# Keys whose value changes nothing loralab computes (bookkeeping, or which
# layers are adapted: loralab reads those from the weight file's names).
NEUTRAL_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
    "lora_dropout", "fan_in_fan_out", "use_rslora", "modules_to_save", "layers_to_transform",
    "layers_pattern", "megatron_core", "runtime_config", "qalora_group_size",
    "init_lora_weights", "use_dora", "target_parameters", "ensure_weight_tying",
    "loftq_config",
})
# Variant keys and the value that means "not used" (peft's default).
VARIANT_DEFAULTS = {"bias": "none", "lora_bias": False, "use_qalora": False,
                    "rank_pattern": {}, "alpha_pattern": {}}


def unsupported_keys(config: dict) -> list[str]:
    """peft config keys set to something loralab does not implement.

    A key loralab has never heard of counts when its value is set (not None,
    False, 0 or empty): it may be a variant a newer peft added, and loading the
    weights without it would give a different model, silently.
    """
    bad = []
    for key, value in config.items():
        if key.startswith("_") or key in NEUTRAL_KEYS:
            continue
        if key in VARIANT_DEFAULTS:
            if value not in (VARIANT_DEFAULTS[key], None):
                bad.append(f"{key}={value!r}")
        elif value not in (None, False, 0, "", {}, []):
            bad.append(f"{key}={value!r}")
    init = config.get("init_lora_weights", True)
    try:
        parse_init(init)
    except LoralabError:
        bad.append(f"init_lora_weights={init!r}")
    return bad


def check_peft_config(config: dict, where: str) -> None:
    """Refuse an adapter whose variant keys loralab would have to ignore."""
    bad = unsupported_keys(config)
    if bad:
        raise LoralabError(
            f"adapter '{where}' uses peft options loralab does not implement: {', '.join(bad)}.",
            hint="Fix: load it with peft itself, or save it without those options "
            "(loralab implements LoRA, rsLoRA, DoRA, PiSSA and OLoRA).")

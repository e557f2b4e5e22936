"""DoRA, PiSSA/OLoRA, rsLoRA and LoRA+: against a hand computation and real peft,
both ways, merged and unmerged; QDoRA against DoRA on the dequantized weights;
bad input refused with one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import cli
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import BUILDERS, logits, randomize_adapters
from torch import nn

from loralab.errors import LoralabError
from loralab.lora import LoRAConfig, LoRALinear, inject_lora, load_adapter, save_adapter
from loralab.lora.variants import unsupported_keys
from loralab.train.optim import make_optimizer

pytestmark = pytest.mark.usefixtures("single_thread")
IDS = torch.randint(4, 120, (2, 9), generator=torch.Generator().manual_seed(3))
PEFT_TARGETS = {"gpt2": ["c_attn", "attn.c_proj"], "llama": ["q_proj", "k_proj", "v_proj",
                                                             "o_proj"]}


def _randomize(model, std=0.1, seed=1):
    """B nonzero (so the adapter does something) and DoRA magnitudes off their init."""
    randomize_adapters(model, std=std, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for mag in m.lora_magnitude_vector.values():
                    mag.weight.mul_(1 + 0.2 * torch.rand(mag.weight.shape, generator=gen))


def _dora(arch, **kw):
    model = BUILDERS[arch]()
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="attention", use_dora=True, **kw))
    _randomize(model)
    return model


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---- DoRA ------------------------------------------------------------------

def test_dora_layer_equals_hand_computation():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(copy.deepcopy(base))
    layer.add_adapter("default", r=3, alpha=6, use_dora=True)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.uniform_(0.5, 2.0)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    W = base.weight + 2.0 * B @ A  # (out, in), scaling 6/3
    W_dora = (m / W.norm(dim=1)).view(-1, 1) * W  # DoRA eq. 5
    x = torch.randn(5, 12)
    assert _max_diff(layer(x), F.linear(x, W_dora, base.bias)) <= 1e-6


def test_dora_norm_is_detached_and_magnitude_trains():
    layer = LoRALinear(nn.Linear(8, 6))
    layer.add_adapter("default", r=2, alpha=4, use_dora=True)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    layer(torch.randn(3, 8)).sum().backward()
    assert layer.lora_magnitude_vector["default"].weight.grad is not None
    # with the norm a constant, d/dB is the plain LoRA gradient scaled by m/||.||
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_equals_peft_on_the_same_weights(arch, tmp_path):
    peft_model = get_peft_model(BUILDERS[arch](), LoraConfig(
        r=4, lora_alpha=8, target_modules=PEFT_TARGETS[arch], use_dora=True,
        fan_in_fan_out=arch == "gpt2", init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "p")
    ours = load_adapter(BUILDERS[arch](), tmp_path / "p").eval()
    expected = logits(peft_model, IDS)
    assert _max_diff(logits(ours, IDS), expected) <= 1e-6
    unmerged = logits(ours, IDS)
    for m in ours.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    assert _max_diff(logits(ours, IDS), expected) <= 1e-5  # merged
    for m in ours.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()
    assert torch.equal(logits(ours, IDS), unmerged)  # unmerge restores the base bit-exactly


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loralab_dora_adapter_loads_in_peft(arch, tmp_path):
    ours = _dora(arch).eval()
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    peft_model = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "ad").eval()
    expected = logits(ours, IDS)
    assert _max_diff(logits(peft_model, IDS), expected) <= 1e-6
    assert _max_diff(logits(peft_model.merge_and_unload(), IDS), expected) <= 1e-5


def test_dora_at_init_equals_base_and_merge_and_unload():
    from loralab.lora import merge_and_unload

    base = BUILDERS["llama"]()
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear", use_dora=True))
    assert _max_diff(logits(model, IDS), logits(base, IDS)) <= 1e-5
    _randomize(model)
    expected = logits(model, IDS)
    assert _max_diff(logits(merge_and_unload(model), IDS), expected) <= 1e-5


def test_qdora_equals_dora_on_dequantized_weights():
    pytest.importorskip("bitsandbytes")
    from loralab.lora.quant import dequantize_weight, is_4bit, quantize_model_4bit

    float_model = BUILDERS["llama"]()
    qmodel = copy.deepcopy(float_model)
    quantize_model_4bit(qmodel)
    ref = copy.deepcopy(float_model)
    for name, module in qmodel.named_modules():
        if is_4bit(module):
            with torch.no_grad():
                ref.get_submodule(name).weight.copy_(dequantize_weight(module))
    for model in (qmodel, ref):
        torch.manual_seed(5)
        inject_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear", use_dora=True))
        _randomize(model)
    assert _max_diff(logits(qmodel, IDS), logits(ref, IDS)) <= 1e-5
    expected = logits(qmodel, IDS)
    for m in qmodel.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    assert _max_diff(logits(qmodel, IDS), expected) <= 1e-5


# ---- PiSSA / OLoRA ----------------------------------------------------------

def _train_a_little(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(steps):
        out = model(IDS, labels=IDS)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch,init", [("llama", "pissa"), ("llama", "olora"),
                                       ("gpt2", "pissa"), ("gpt2", "olora"),
                                       ("llama", "pissa_niter_4")])
def test_mutated_init_starts_at_base_and_converts_to_plain_lora(arch, init, tmp_path):
    base = BUILDERS[arch]()
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="attention", init_lora_weights=init))
    assert _max_diff(logits(model, IDS), logits(base, IDS)) <= 1e-5  # W_res + s·B0A0 = W
    _train_a_little(model)
    trained = logits(model, IDS)
    save_adapter(model, tmp_path / "lora", as_lora=True)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    ours = load_adapter(BUILDERS[arch](), tmp_path / "lora")  # onto the original base
    assert _max_diff(logits(ours, IDS), trained) <= 1e-5
    peft_model = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "lora").eval()
    assert _max_diff(logits(peft_model, IDS), trained) <= 1e-5


def test_residual_form_reloads_by_redoing_the_init(tmp_path):
    """The rank-r form: peft (and loralab) redo the PiSSA SVD on the base on load."""
    model = BUILDERS["llama"]()
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="attention", init_lora_weights="pissa"))
    _train_a_little(model)
    trained = logits(model, IDS)
    save_adapter(model, tmp_path / "res")
    cfg = json.loads((tmp_path / "res" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["init_lora_weights"] == "pissa"
    assert _max_diff(logits(load_adapter(BUILDERS["llama"](), tmp_path / "res"), IDS),
                     trained) <= 1e-4
    peft_model = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "res").eval()
    assert _max_diff(logits(peft_model, IDS), trained) <= 1e-4


def test_pissa_factors_equal_peft():
    base = BUILDERS["llama"]()
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(r=4, alpha=8, targets=["q_proj"], init_lora_weights="olora"))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="olora"))
    ol = ours.model.layers[0].self_attn.q_proj
    pl = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert _max_diff(ol.lora_A["default"].weight, pl.lora_A["default"].weight) <= 1e-6
    assert _max_diff(ol.base_layer.weight, pl.base_layer.weight) <= 1e-6


def test_pissa_on_4bit_base_is_refused():
    pytest.importorskip("bitsandbytes")
    from loralab.lora.quant import quantize_model_4bit

    model = BUILDERS["llama"]()
    quantize_model_4bit(model)
    with pytest.raises(LoralabError, match="4-bit"):
        inject_lora(model, LoRAConfig(r=4, alpha=8, init_lora_weights="pissa"))


# ---- rsLoRA, LoRA+ ------------------------------------------------------------

def test_rslora_scaling_and_config(tmp_path):
    model = BUILDERS["llama"]()
    inject_lora(model, LoRAConfig(r=16, alpha=8, targets=["q_proj"], use_rslora=True))
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(2.0)
    save_adapter(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["use_rslora"]


def test_lora_plus_gives_b_ratio_times_lr():
    model = BUILDERS["bert"]()
    inject_lora(model, LoRAConfig(r=4, alpha=8, task="classify", use_dora=True))
    opt = make_optimizer(model, 1e-3, 0.01, lora_plus_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        is_b = {"lora_B" in names[id(p)].split(".") for p in group["params"]}
        assert len(is_b) == 1
        assert group["lr"] == pytest.approx(16e-3 if is_b.pop() else 1e-3)
    b_params = [p for g in opt.param_groups if g["lr"] > 1e-3 for p in g["params"]]
    assert len(b_params) == sum("lora_B" in n for n, _ in model.named_parameters())
    plain = make_optimizer(model, 1e-3, 0.01)
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


# ---- bad input -----------------------------------------------------------------

def test_unknown_variant_keys_are_refused_on_load(tmp_path):
    save_adapter(_dora("llama"), tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(use_qalora=True, lora_bias=True, rank_pattern={"q_proj": 8},
               init_lora_weights="corda", eva_config=None, megatron_core="megatron.core")
    path.write_text(json.dumps(cfg))
    assert sorted(unsupported_keys(cfg)) == sorted([
        "lora_bias=True", "rank_pattern={'q_proj': 8}", "use_qalora=True",
        "init_lora_weights='corda'"])
    with pytest.raises(LoralabError, match="use_qalora=True") as err:
        load_adapter(BUILDERS["llama"](), tmp_path / "ad")
    assert "\n" not in str(err.value)


def test_magnitudes_without_use_dora_are_refused(tmp_path):
    save_adapter(_dora("llama"), tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), use_dora=False)))
    with pytest.raises(LoralabError, match="lora_magnitude_vector"):
        load_adapter(BUILDERS["llama"](), tmp_path / "ad")


@pytest.mark.parametrize("flags", [
    ("--method", "head", "--use-dora"),
    ("--method", "head", "--init-lora-weights", "pissa"),
    ("--method", "qlora", "--init-lora-weights", "olora"),
    ("--method", "full", "--lora-plus-ratio", "16"),
    ("--method", "lora", "--lora-plus-ratio", "0"),
    ("--method", "lora", "--init-lora-weights", "loftq"),
    ("--method", "lora", "init_lora_weights=false"),
])
def test_variant_that_does_not_apply_exits_2_with_one_line(flags, capsys, tmp_path):
    assert cli("train", "--output", tmp_path / "run", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err


# ---- end to end: `loralab train` -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    from train_support import save_tiny, sft_records, write_jsonl

    root = tmp_path_factory.mktemp("variants")
    return save_tiny(root, "llama"), write_jsonl(root / "sft.jsonl", sft_records(24))


def test_train_pissa_dora_lora_plus_writes_both_forms(tiny_run_inputs, tmp_path):
    from loralab.lora.adapters import load_base_and_adapter

    model, data = tiny_run_inputs
    out = tmp_path / "run"
    assert cli("train", "--model", model, "--data", data, "--method", "lora", "--rank", 4,
               "--use-dora", "--init-lora-weights", "pissa", "--lora-plus-ratio", 16,
               "--max-steps", 3, "--batch-size", 4, "--lr", 1e-3, "--output", out,
               "--quiet") == 0
    main = json.loads((out / "adapter" / "adapter_config.json").read_text())
    residual = json.loads((out / "adapter-residual" / "adapter_config.json").read_text())
    assert (main["r"], main["init_lora_weights"], main["use_dora"]) == (8, True, True)
    assert (residual["r"], residual["init_lora_weights"]) == (4, "pissa")
    saved = yaml_config(out)
    assert (saved["use_dora"], saved["init_lora_weights"], saved["lora_plus_ratio"]) == (
        True, "pissa", 16.0)
    # the plain form on the original base = the residual form with the SVD redone
    a, _, _ = load_base_and_adapter(out / "adapter")
    b, _, _ = load_base_and_adapter(out / "adapter-residual")
    ids = IDS % a.config.vocab_size
    assert _max_diff(logits(a, ids), logits(b, ids)) <= 1e-4


def yaml_config(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())

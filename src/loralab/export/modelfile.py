"""An Ollama ``Modelfile`` for an exported GGUF: FROM, TEMPLATE, SYSTEM, stops.

Ollama templates are Go ``text/template``s over ``.Messages``; HF chat
templates are Jinja. Rather than translate Jinja, the chat template is
*rendered* with marker messages and the text around each marker read off:
for per-message templates (ChatML as in SmolLM2 and Qwen, Llama 3, Gemma)
each role is ``prefix + content + suffix``, with a generation prompt after the
last user turn. A default system prompt the template inserts when none is
given becomes the Modelfile's SYSTEM line (Ollama sends it as a system message).
The split is then checked: a Python mirror of the emitted Go template must
reproduce the Jinja output on several conversations, or no TEMPLATE is written
and Ollama falls back to its own detection from the GGUF's chat template.
"""

from __future__ import annotations

import re

ROLES = ("system", "user", "assistant")
_M = {"system": "\u2063SYS\u2063", "user": "\u2063USR{}\u2063", "assistant": "\u2063AST{}\u2063"}


def _render(tok, messages: list[dict], gen: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _pieces(text: str, markers: list[str]) -> list[str] | None:
    out = []
    for m in markers:
        if m not in text:
            return None
        head, text = text.split(m, 1)
        out.append(head)
    return out + [text]


def _specials(tok) -> list[str]:
    names = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    return sorted(names | set(tok.all_special_tokens), key=len, reverse=True)


def _split_after_special(s: str, specials: list[str]) -> int:
    """End of a turn: after the first special token in ``s`` and its newlines."""
    hits = [(s.find(t), t) for t in specials if t and t in s]
    if not hits:
        return len(s)
    pos, tok = min(hits, key=lambda h: (h[0], -len(h[1])))
    end = pos + len(tok)
    while end < len(s) and s[end] == "\n":
        end += 1
    return end


def _conv(system: bool, turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": _M["system"]}] if system else []
    for i in range(turns):
        msgs.append({"role": "user", "content": _M["user"].format(i)})
        if i < turns - 1:
            msgs.append({"role": "assistant", "content": _M["assistant"].format(i)})
    return msgs


def _markers(msgs):
    return [m["content"] for m in msgs]


def extract_spec(tok) -> dict | None:
    """Role prefixes/suffixes, generation prompt, head and default system text
    read off the rendered template; None when it is not per-message."""
    try:
        two = _conv(False, 2)
        p = _pieces(_render(tok, two, True), _markers(two))  # head+u_pre U u_suf+a_pre A ...
        if p is None:
            return None
        specials = _specials(tok)
        k = _split_after_special(p[1], specials)
        spec = {"user": [None, p[1][:k]], "assistant": [p[1][k:], None]}
        k = _split_after_special(p[2], specials)
        spec["assistant"][1], spec["user"][0] = p[2][:k], p[2][k:]
        if not p[3].startswith(spec["user"][1]):
            return None
        spec["gen"] = p[3][len(spec["user"][1]):]
        lead = p[0]
        if not lead.endswith(spec["user"][0]):
            return None
        lead = lead[: len(lead) - len(spec["user"][0])]
        spec.update(_system_parts(tok, spec, lead, specials))
        return spec
    except Exception:  # noqa: BLE001 - a template that raises is one we cannot translate
        return None


def _system_parts(tok, spec: dict, lead: str, specials) -> dict:
    """Head (BOS text), the system role's wrapper, a default system prompt."""
    bos = tok.bos_token or ""
    one = _conv(True, 1)
    try:
        text = _render(tok, one, True)
    except Exception:  # noqa: BLE001 - e.g. Gemma: "System role not supported"
        # a template that refuses system turns: they go in as user turns,
        # as Ollama's own Gemma template does
        return {"head": lead, "system": None, "default_system": None}
    p = _pieces(text, _markers(one))
    if p is None or not p[1].endswith(spec["user"][0]):
        raise ValueError("system turn is not a message of its own (folded into another)")
    sys_pre, sys_suf = p[0], p[1][: len(p[1]) - len(spec["user"][0])]
    # BOS text before every conversation, not the first letters of a role prefix
    # (SmolLM2's BOS is "<|im_start|>", which also opens each ChatML turn)
    head = bos if bos and sys_pre.startswith(bos) and lead.startswith(bos) and not \
        spec["user"][0].startswith(bos) else ""
    sys_pre, body = sys_pre[len(head):], lead[len(head):]
    default = None
    if body and body.startswith(sys_pre) and body.endswith(sys_suf):
        default = body[len(sys_pre): len(body) - len(sys_suf)]
    elif body:
        raise ValueError("text before the first turn that is not a system message")
    return {"head": head, "system": [sys_pre, sys_suf], "default_system": default}


def render_spec(spec: dict, messages: list[dict], default_system: bool = True) -> str:
    """What the Go template from ``go_template(spec)`` renders, in Python,
    with Ollama's SYSTEM line applied when the conversation has none."""
    if default_system and spec["default_system"] and \
            (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": spec["default_system"]}] + messages
    out = [spec["head"]]
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        pre, suf = (spec["system"] or spec["user"]) if m["role"] == "system" else spec[m["role"]]
        if m["role"] == "assistant":
            out.append(pre + m["content"] + ("" if last else suf))
        else:
            out.append(pre + m["content"] + suf + (spec["gen"] if last else ""))
    return "".join(out)


def _go(s: str) -> str:
    return s  # literal text: a Go template copies it unchanged (no "{{" allowed)


def go_template(spec: dict) -> str:
    """The Ollama TEMPLATE (one line of actions; literal text kept exact)."""
    sys_pre, sys_suf = spec["system"] or spec["user"]
    u_pre, u_suf = spec["user"]
    a_pre, a_suf = spec["assistant"]
    head = "" if spec.get("bos_added") else spec["head"]  # llama.cpp adds that BOS itself
    return (_go(head) + '{{ range $i, $_ := .Messages }}'
            '{{ $last := eq (len (slice $.Messages $i)) 1 }}'
            f'{{{{ if eq .Role "system" }}}}{_go(sys_pre)}{{{{ .Content }}}}{_go(sys_suf)}'
            f'{{{{ if $last }}}}{_go(spec["gen"])}{{{{ end }}}}'
            f'{{{{ else if eq .Role "user" }}}}{_go(u_pre)}{{{{ .Content }}}}{_go(u_suf)}'
            f'{{{{ if $last }}}}{_go(spec["gen"])}{{{{ end }}}}'
            f'{{{{ else if eq .Role "assistant" }}}}{_go(a_pre)}{{{{ .Content }}}}'
            f'{{{{ if not $last }}}}{_go(a_suf)}{{{{ end }}}}'
            '{{ end }}{{ end }}')


CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Salut"},
     {"role": "user", "content": "Again"}],
]


def translate(tok) -> tuple[dict | None, str]:
    """(spec, why): spec checked against the Jinja template, or None and the reason."""
    if not getattr(tok, "chat_template", None):
        return None, "the tokenizer has no chat template"
    spec = extract_spec(tok)
    if spec is None:
        return None, "the chat template is not a per-message template"
    texts = [spec["head"], spec["gen"], *spec["user"], *spec["assistant"], *(spec["system"] or [])]
    if any("{{" in t or "}}" in t for t in texts):
        return None, "the template's text contains '{{'"
    for conv in CHECK_CONVERSATIONS:
        if spec["system"] is None and conv[0]["role"] == "system":
            continue  # system turns render as user turns, as Ollama's Gemma template does
        try:
            want = _render(tok, conv, True)
        except Exception as err:  # noqa: BLE001 - any template error: no translation
            return None, f"the chat template fails on a check conversation ({err})"
        if render_spec(spec, conv) != want:
            return None, "the translated template does not reproduce the chat template"
    from loralab.export.vocab import adds_special

    spec["bos_added"] = bool(spec["head"]) and spec["head"] == tok.bos_token and \
        adds_special(tok)[0]
    return spec, f"checked on {len(CHECK_CONVERSATIONS)} conversations"


def stop_tokens(tok, spec: dict | None) -> list[str]:
    """End-of-turn specials (from the assistant suffix) and the EOS token."""
    stops = []
    if spec is not None:
        stops += [t for t in _specials(tok) if t in (spec["assistant"][1] or "")]
    if tok.eos_token:
        stops.append(tok.eos_token)
    return list(dict.fromkeys(s for s in stops if s.strip()))


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_name: str, tok) -> tuple[str, dict]:
    """The Modelfile and a summary (template written or why not, stops)."""
    spec, why = translate(tok)
    lines = [f"FROM ./{gguf_name}"]
    if spec is not None:
        if '"""' in go_template(spec):
            spec, why = None, 'the template contains """'
        else:
            lines.append(f'TEMPLATE """{go_template(spec)}"""')
            if spec["default_system"]:
                lines.append(f'SYSTEM """{spec["default_system"]}"""')
    stops = stop_tokens(tok, spec)
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    return "\n".join(lines) + "\n", {"template": spec is not None, "template_note": why,
                                     "stop": stops}


def ollama_name(stem: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-") or "loralab-model"

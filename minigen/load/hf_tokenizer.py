"""Tokenizer of a Hugging Face model directory: tokenizer.json, else tokenizer.model
(sentencepiece), else vocab.json + merges.txt; special tokens, chat template and BOS/EOS handling
from tokenizer_config.json, special_tokens_map.json and generation_config.json, as transformers
reads them."""
from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers

from minigen.errors import LoadError
from minigen.load.tokenizer import Tokenizer, set_bos_eos_processor


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is not valid JSON ({e}); re-download or fix it") from None


def _token_str(value) -> str | None:
    """tokenizer_config special token: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def _chat_template_from(d: Path, tok_cfg: dict) -> str | None:
    jinja_file = d / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    tpl = tok_cfg.get("chat_template")
    if isinstance(tpl, list):   # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if tpl is None and (d / "chat_template.json").is_file():
        tpl = _read_json(d / "chat_template.json").get("chat_template")
    return tpl or None


def _added_tokens(tok_cfg: dict) -> list[tuple[int, AddedToken]]:
    """tokenizer_config.json "added_tokens_decoder": {"id": {"content": ..., "special": ...}}."""
    out = []
    for idx, spec in (tok_cfg.get("added_tokens_decoder") or {}).items():
        if isinstance(spec, dict) and "content" in spec:
            out.append((int(idx), AddedToken(spec["content"], special=bool(spec.get("special", True)),
                                             normalized=bool(spec.get("normalized", False)),
                                             lstrip=bool(spec.get("lstrip", False)),
                                             rstrip=bool(spec.get("rstrip", False)),
                                             single_word=bool(spec.get("single_word", False)))))
    return sorted(out, key=lambda x: x[0])


def load_hf_tokenizer(d: Path, hf_config: dict | None = None) -> Tokenizer:
    """Tokenizer of a Hugging Face model directory: tokenizer.json, else tokenizer.model
    (sentencepiece), else vocab.json + merges.txt (GPT-2 / OPT byte-level BPE)."""
    d = Path(d)
    hf_config = hf_config or {}
    tok_cfg = _read_json(d / "tokenizer_config.json")
    st_map = _read_json(d / "special_tokens_map.json")
    gen_cfg = _read_json(d / "generation_config.json")
    bos = _token_str(tok_cfg.get("bos_token", st_map.get("bos_token")))
    eos = _token_str(tok_cfg.get("eos_token", st_map.get("eos_token")))
    template = _chat_template_from(d, tok_cfg)
    extra = {k: s for k in ("unk_token", "pad_token")
             if (s := _token_str(tok_cfg.get(k, st_map.get(k)))) is not None}
    explicit_flags = "add_bos_token" in tok_cfg or "add_eos_token" in tok_cfg

    if (d / "tokenizer.json").is_file():
        try:
            tk = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise LoadError(f"{d / 'tokenizer.json'} could not be read ({str(e).splitlines()[0]}); "
                            "re-download it") from None
        _add_missing_tokens(tk, tok_cfg, st_map)
        if explicit_flags or tk.post_processor is None:
            set_bos_eos_processor(tk, bos, eos, bool(tok_cfg.get("add_bos_token", False)),
                                   bool(tok_cfg.get("add_eos_token", False)))
        ids = _special_ids(tk.token_to_id, bos, eos, hf_config, gen_cfg)
        return Tokenizer(backend=tk, bos_token=bos, eos_token=eos, chat_template=template,
                         extra_template_vars=extra, **ids)

    if (d / "tokenizer.model").is_file():
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(d / "tokenizer.model"))
        except (OSError, RuntimeError) as e:
            raise LoadError(f"{d / 'tokenizer.model'} is not a sentencepiece model ({e}); re-download it") from None
        bos = bos or (sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None)
        eos = eos or (sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None)
        added = {t.content: i for i, t in _added_tokens(tok_cfg)}
        special = {i for i, t in _added_tokens(tok_cfg) if t.special}
        for s in _named_special_tokens(tok_cfg, st_map):   # e.g. "<pad>" defined as a user piece
            if s not in added and (i := sp.piece_to_id(s)) != sp.unk_id():
                added[s] = i
                special.add(i)

        def lookup(s):
            if s in added:
                return added[s]
            i = sp.piece_to_id(s)
            return None if i == sp.unk_id() else i
        ids = _special_ids(lookup, bos, eos, hf_config, gen_cfg)
        # transformers' LlamaTokenizer: add_prefix_space (default True) and legacy (default False)
        if tok_cfg.get("add_prefix_space") is False:
            scheme = "never"
        else:
            scheme = "always" if tok_cfg.get("legacy") is True else "first"
        return Tokenizer(sp=sp, bos_token=bos, eos_token=eos, chat_template=template,
                         add_bos=bool(tok_cfg.get("add_bos_token", True)),
                         add_eos=bool(tok_cfg.get("add_eos_token", False)), prefix_scheme=scheme,
                         added_tokens=added, special_ids=special, extra_template_vars=extra, **ids)

    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        try:
            model = tokenizers.models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt"))
        except Exception as e:
            raise LoadError(f"vocab.json/merges.txt in {d} could not be read ({e}); re-download them") from None
        tk = tokenizers.Tokenizer(model)
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(tok_cfg.get("add_prefix_space", False)))
        tk.decoder = decoders.ByteLevel()
        _add_missing_tokens(tk, tok_cfg, st_map)
        # GPT2Tokenizer adds no BOS unless add_bos_token (OPT's tokenizer_config sets it)
        set_bos_eos_processor(tk, bos, eos, bool(tok_cfg.get("add_bos_token", False)),
                               bool(tok_cfg.get("add_eos_token", False)))
        ids = _special_ids(tk.token_to_id, bos, eos, hf_config, gen_cfg)
        return Tokenizer(backend=tk, bos_token=bos, eos_token=eos, chat_template=template,
                         extra_template_vars=extra, **ids)

    raise LoadError(f"no tokenizer in {d}: expected tokenizer.json, tokenizer.model or vocab.json+merges.txt; "
                    "copy the tokenizer files from the original model")


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _named_special_tokens(tok_cfg: dict, st_map: dict) -> list[str]:
    """Every special token string tokenizer_config / special_tokens_map name."""
    out = []
    for key in _SPECIAL_KEYS:
        if (s := _token_str(tok_cfg.get(key, st_map.get(key)))) is not None:
            out.append(s)
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = tok_cfg.get(key, st_map.get(key))
        if isinstance(extra, list):
            out += [s for v in extra if (s := _token_str(v)) is not None]
    return list(dict.fromkeys(out))


def _add_missing_tokens(tk: tokenizers.Tokenizer, tok_cfg: dict, st_map: dict):
    """Register tokenizer_config's added tokens and named special tokens that the backend does
    not know as added tokens, so they are matched whole in text, as transformers does."""
    have_text = {t.content for t in tk.get_added_tokens_decoder().values()}
    for _, tok in _added_tokens(tok_cfg):
        if tok.content not in have_text:
            (tk.add_special_tokens if tok.special else tk.add_tokens)([tok])
            have_text.add(tok.content)
    missing = [s for s in _named_special_tokens(tok_cfg, st_map) if s not in have_text]
    if missing:
        tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in missing])


def _special_ids(lookup, bos: str | None, eos: str | None, hf_config: dict, gen_cfg: dict) -> dict:
    """bos_id and the merged eos ids: generation_config.json, config.json, tokenizer eos_token."""
    bos_id = lookup(bos) if bos else None
    for src in (gen_cfg, hf_config):
        if bos_id is None and isinstance(src.get("bos_token_id"), int):
            bos_id = src["bos_token_id"]
    eos_ids = _as_id_list(gen_cfg.get("eos_token_id")) + _as_id_list(hf_config.get("eos_token_id"))
    if eos and (i := lookup(eos)) is not None:
        eos_ids.append(i)
    return {"bos_id": bos_id, "eos_ids": list(dict.fromkeys(eos_ids))}

"""Tokenizer, chat template and streaming detokenizer.

One `Tokenizer` class over two backends:
  - a Hugging Face `tokenizers.Tokenizer` (tokenizer.json, vocab.json+merges.txt, or one the GGUF
    loader builds from metadata): byte-level BPE (GPT-2, OPT, SmolLM2, Llama 3) or Metaspace BPE
    (Llama 2 converted by transformers);
  - a sentencepiece model (tokenizer.model) when no tokenizer.json is present.

Encoding follows transformers: `encode(text)` equals `AutoTokenizer(dir)(text)["input_ids"]`, and
text rendered from a chat template is encoded with `add_special_tokens=False` because the
template writes BOS itself.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, pre_tokenizers, processors

from minigen.loader import LoadError

NO_TEMPLATE_MSG = "this model has no chat template; use --prompt with --raw (plain text completion)"


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

class Tokenizer:
    """Text <-> token ids for one model.

    bos_id: id of the BOS token (None if the model has none); whether `encode` prepends it is the
    tokenizer's own rule (post-processor / add_bos_token). eos_ids: every id that ends generation.
    """

    def __init__(self, *, backend: tokenizers.Tokenizer | None = None, sp=None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 bos_id: int | None = None, eos_ids: list[int] | None = None,
                 add_bos: bool = False, add_eos: bool = False, prefix_scheme: str = "first",
                 added_tokens: dict[str, int] | None = None, special_ids: set[int] | None = None,
                 chat_template: str | None = None, extra_template_vars: dict | None = None):
        if (backend is None) == (sp is None):
            raise ValueError("Tokenizer needs exactly one backend (tokenizers or sentencepiece)")
        self._tk = backend
        self._sp = sp
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = bos_id
        self.eos_ids = list(dict.fromkeys(eos_ids or []))   # dedupe, keep order
        self.chat_template = chat_template
        self._template_vars = dict(extra_template_vars or {})
        if sp is not None:
            self._sp_add_bos, self._sp_add_eos = add_bos, add_eos
            self._sp_prefix = prefix_scheme
            self._sp_added = dict(added_tokens or {})    # text -> id, matched whole in the input
            self._sp_special = set(special_ids or set())
            for i in range(sp.get_piece_size()):
                if sp.is_control(i) or sp.is_unknown(i):
                    self._sp_added.setdefault(sp.id_to_piece(i), i)
                    self._sp_special.add(i)
            self._sp_id_to_added = {i: t for t, i in self._sp_added.items()}
            self._sp_eos_id = self._sp_added.get(eos_token, sp.piece_to_id(eos_token)) if eos_token else sp.eos_id()
            # longest first so "<|a|>" wins over "<|a"
            alts = sorted(self._sp_added, key=len, reverse=True)
            self._sp_split = re.compile("(" + "|".join(map(re.escape, alts)) + ")") if alts else None
            # the "unk prefix" trick: encode "<unk>"+text and drop the unk pieces, so a chunk that
            # does not start the text gets no dummy-prefix "▁" (transformers' non-legacy behaviour)
            self._sp_unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else "<unk>"
            self._sp_unk_len = len(sp.encode(self._sp_unk, out_type=int))

    # -- properties --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        if self._tk is not None:
            return self._tk.get_vocab_size(with_added_tokens=True)
        return max(self._sp.get_piece_size(), max(self._sp_added.values(), default=-1) + 1)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._chat_template)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, source: str | None):
        self._chat_template, self._compiled = source, None

    def token_to_id(self, token: str) -> int | None:
        if self._tk is not None:
            return self._tk.token_to_id(token)
        if token in self._sp_added:
            return self._sp_added[token]
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp_unk else i

    def id_to_token(self, token_id: int) -> str | None:
        if self._tk is not None:
            return self._tk.id_to_token(token_id)
        return self._sp_id_to_added.get(token_id) or self._sp.id_to_piece(token_id)

    # -- encode / decode ---------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._tk is not None:
            return self._tk.encode(text, add_special_tokens=add_special_tokens).ids
        ids: list[int] = []
        chunks = self._sp_split.split(text) if self._sp_split else [text]
        for k, chunk in enumerate(chunks):
            if k % 2 == 1:                   # odd chunks are the matched added/special tokens
                ids.append(self._sp_added[chunk])
            elif chunk:
                ids += self._sp_encode_chunk(chunk, at_start=(k == 0))
        if add_special_tokens:
            if self._sp_add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self._sp_add_eos and self._sp_eos_id >= 0:
                ids.append(self._sp_eos_id)
        return ids

    def _sp_encode_chunk(self, chunk: str, at_start: bool) -> list[int]:
        # prefix_scheme (transformers' Metaspace): "first" -> only the chunk that starts the text
        # gets sentencepiece's dummy-prefix "▁"; "always" (legacy) -> every chunk; "never".
        # Like Metaspace, a chunk that already starts with a space gets no second one.
        wants = self._sp_prefix == "always" or (at_start and self._sp_prefix == "first")
        if wants and not chunk.startswith(" "):
            return self._sp.encode(chunk, out_type=int)
        return self._sp.encode(self._sp_unk + chunk, out_type=int)[self._sp_unk_len:]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self._tk is not None:
            return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)
        # sentencepiece, decoded the way transformers' converted Llama tokenizer does: special
        # tokens as their text, "▁" -> " ", <0xAB> byte pieces fused into UTF-8, then one
        # leading space (the dummy prefix) stripped from the whole string
        sp, out = self._sp, bytearray()
        for i in ids:
            if i in self._sp_id_to_added:
                if not (skip_special_tokens and i in self._sp_special):
                    out += self._sp_id_to_added[i].encode()
            elif sp.is_byte(i):
                out.append(int(sp.id_to_piece(i)[1:-1], 16))
            else:
                out += sp.id_to_piece(i).replace("\u2581", " ").encode()
        text = out.decode("utf-8", errors="replace")
        return text[1:] if self._sp_prefix != "never" and text.startswith(" ") else text

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # -- chat template -----------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages with the model's Jinja chat template (as transformers does, tokenize=False)."""
        if not self.chat_template:
            raise LoadError(NO_TEMPLATE_MSG)
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        variables = {**self._template_vars, "bos_token": self.bos_token or "",
                     "eos_token": self.eos_token or "", **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Template + encode, without adding special tokens (the template writes BOS itself)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): render the body."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes <, >, &, ' -- chat templates want plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox with the environment transformers uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LoadError(f"the model's chat template does not parse ({e}); fix chat_template in tokenizer_config.json") from None


# ---------------------------------------------------------------------------------------------
# Streaming detokenizer
# ---------------------------------------------------------------------------------------------

class StreamDecoder:
    """Turns a stream of token ids into text pieces whose concatenation equals decode(all ids).

    Keeps a small window ids[prefix:]; each push decodes the window and emits the part past the
    already-emitted prefix. Decoding a window (not a lone token) keeps sentencepiece's leading-space
    handling right, and the new text is held back while it ends in U+FFFD (an unfinished multi-byte
    UTF-8 character split over byte tokens). Cost: O(window) per token.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0      # window start: decode(ids[prefix:read]) is text already emitted
        self._read = 0        # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if text.endswith("\ufffd") or len(text) <= len(prefix_text):
            return ""   # unfinished character (or nothing new yet): hold back
        delta = text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (a trailing broken character comes out as U+FFFD) and reset."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(prefix_text):]


# ---------------------------------------------------------------------------------------------
# Hugging Face directory tokenizers
# ---------------------------------------------------------------------------------------------

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


def set_bos_eos_processor(tk: tokenizers.Tokenizer, bos: str | None, eos: str | None,
                           add_bos: bool, add_eos: bool):
    """A TemplateProcessing that adds BOS/EOS per the add_*_token flags (what transformers does)."""
    bos_id = tk.token_to_id(bos) if bos else None
    eos_id = tk.token_to_id(eos) if eos else None
    add_bos, add_eos = add_bos and bos_id is not None, add_eos and eos_id is not None
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


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
        import sentencepiece as spm
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

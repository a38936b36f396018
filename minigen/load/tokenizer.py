"""Tokenizer, chat template and streaming detokenizer.

One `Tokenizer` class over two backends:
  - a Hugging Face `tokenizers.Tokenizer` (tokenizer.json, vocab.json+merges.txt, or one the GGUF
    loader builds from metadata): byte-level BPE (GPT-2, OPT, SmolLM2, Llama 3) or Metaspace BPE
    (Llama 2 converted by transformers);
  - a sentencepiece model (tokenizer.model) when no tokenizer.json is present.

Encoding follows transformers: `encode(text)` equals `AutoTokenizer(dir)(text)["input_ids"]`, and
text rendered from a chat template is encoded with `add_special_tokens=False` because the
template writes BOS itself. Reading a Hugging Face model directory's tokenizer files is
minigen/load/hf_tokenizer.py; the GGUF loader builds its tokenizer from metadata (minigen/load/gguf.py).
"""
from __future__ import annotations

import json
import re
from datetime import datetime

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import processors

from minigen.errors import LoadError

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
# Shared by the loaders (minigen/load/hf_tokenizer.py, minigen/load/gguf.py)
# ---------------------------------------------------------------------------------------------

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

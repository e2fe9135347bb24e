"""Text tokenizer wrapper that keeps user text and special tokens apart.

Special tokens (image patches, trigger, location) are only ever inserted by id.
User text is encoded with ``encode_special_tokens`` on, so a user who types
``<at>`` or ``<loc>`` gets the characters, never the token: nothing a user
writes can trigger a box or inject an image slot.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from ..errors import ModelFileError
from .config import SpecialTokens

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, tokens: SpecialTokens, bos: str | None = "<s>", eos: str = "</s>"):
        self._tok = tokenizer
        # Added/special tokens in user text are encoded as plain text.
        self._tok.encode_special_tokens = True
        self.tokens = tokens
        self.ids: dict[str, int] = {}
        missing = []
        for name in tokens.all() + [eos] + ([bos] if bos else []):
            token_id = tokenizer.token_to_id(name)
            if token_id is None:
                missing.append(name)
            else:
                self.ids[name] = token_id
        if missing:
            raise ModelFileError(f"the tokenizer has no token(s) {missing}; a NExT-Chat tokenizer needs {tokens.all()}")
        self.bos_id = self.ids[bos] if bos else None
        self.eos_id = self.ids[eos]
        self.image_patch_id = self.ids[tokens.image_patch]
        self.image_start_id = self.ids[tokens.image_start]
        self.image_end_id = self.ids[tokens.image_end]
        self.trigger_id = self.ids[tokens.trigger]
        self.location_id = self.ids[tokens.location]
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special) | frozenset(self.ids.values())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Never yields a special token id."""
        if not text:
            return []
        ids = self._tok.encode(text, add_special_tokens=False).ids
        leaked = self.special_ids.intersection(ids)
        if leaked:  # defence in depth: encode_special_tokens should make this impossible
            raise AssertionError(f"special token ids {sorted(leaked)} leaked from text {text!r}")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self._tok.save(str(Path(directory) / TOKENIZER_FILE))

    @classmethod
    def load(cls, directory: str | Path, tokens: SpecialTokens) -> TextTokenizer:
        """Load ``tokenizer.json`` from ``directory`` (or convert a slow tokenizer there)."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if path.is_file():
            try:
                return cls(Tokenizer.from_file(str(path)), tokens)
            except Exception as exc:  # tokenizers raises plain Exception subclasses
                if isinstance(exc, ModelFileError):
                    raise ModelFileError(f"{path}: {exc}") from None
                raise ModelFileError(f"tokenizer file {path} cannot be read: {exc}") from None
        if (directory / "tokenizer.model").is_file():
            # Released checkpoints ship a SentencePiece model; transformers converts it.
            from transformers import AutoTokenizer

            try:
                fast = AutoTokenizer.from_pretrained(str(directory), use_fast=True, local_files_only=True)
            except Exception as exc:
                raise ModelFileError(
                    f"cannot convert {directory / 'tokenizer.model'} to a fast tokenizer: {exc}") from None
            return cls(fast.backend_tokenizer, tokens)
        raise ModelFileError(f"no tokenizer in {directory}: expected {path}")

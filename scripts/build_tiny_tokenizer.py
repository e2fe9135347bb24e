"""Build the tiny preset's tokenizer offline (byte-level BPE) and write it into
nextchat_ros/assets/tokenizers/tiny/tokenizer.json.

Byte-level BPE encodes any text (no unknown tokens); the merges are learnt from
a corpus of the words robots and their users use about tabletop scenes, so the
common words are single tokens. Deterministic: the same corpus gives the same
file. Run:  .venv/bin/python scripts/build_tiny_tokenizer.py
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "nextchat_ros" / "assets" / "tokenizers" / "tiny"

BASE_SPECIAL = ["<s>", "</s>", "<unk>", "<pad>"]
MODEL_SPECIAL = ["<im_patch>", "<im_start>", "<im_end>", "<trigger>", "<loc>"]

COLORS = "red green blue yellow orange purple pink white black gray grey brown cyan magenta".split()
SIZES = "small large big tiny huge little medium tall short thin wide".split()
OBJECTS = ("cube block box ball sphere cup mug cylinder can ring torus bottle cone pyramid plate bowl "
           "tool screwdriver hammer apple banana object thing item toy marker pen book phone").split()
RELATIONS = ["left of", "right of", "behind", "in front of", "next to", "near", "nearest to", "farthest from",
             "on top of", "under", "between", "above", "below", "beside", "closest to"]
QUESTIONS = ["where is the {o}?", "find the {c} {o}.", "is there a {c} {o} in the image?",
             "how many {o}s are there?", "what is {r} the {o}?", "describe [0].", "what color is [0]?",
             "pick up the {s} {c} {o}.", "put the {o} {r} the {c} {o}.", "point to the {s} {o}.",
             "describe the image and ground every object.", "what is the largest object?",
             "segment the {c} {o} {r} the {o}.", "which object is {r} [0]?", "show me all the {c} {o}s."]
ANSWERS = ["the {c} {o} [0] is {r} the {o} [1].", "yes, there is a {c} {o} [0].", "no, there is no {c} {o}.",
           "there are {n} {o}s.", "a {s} {c} {o} [0].", "Answer: [0] .", "I see a {c} {o} [0] and a {o} [1]."]
WORDS = ("the a an is are there this that it of in on to and or with yes no what where which how many much "
         "image picture scene table robot gripper camera color shape size answer question user assistant "
         "please can you could see pick place put move grab push hold describe count left right top bottom "
         "first second third one two three four five six seven eight nine ten zero none all every each some "
         "front back center middle corner edge empty full open closed red-ish bright dark shiny matte").split()


def corpus() -> list[str]:
    lines = []
    for c, o, s, r in itertools.islice(
            itertools.product(COLORS, OBJECTS, SIZES, RELATIONS), 0, None, 7):
        n = str(len(lines) % 10)
        for template in QUESTIONS + ANSWERS:
            lines.append(template.format(c=c, o=o, s=s, r=r, n=n))
    lines.append(" ".join(WORDS))
    lines.append("A robot asks about its camera image. USER: ASSISTANT:")
    lines += [str(i) for i in range(100)]
    return lines


def build(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=BASE_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MODEL_SPECIAL])
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tok = build(args.vocab_size)
    tok.save(str(args.out / "tokenizer.json"))
    print(f"wrote {args.out / 'tokenizer.json'} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write sample_data/sequences.jsonl (12 short stored sequences).

The texts are written for the chunktui project; this script only serialises
them so the JSON escaping is always valid. Usage:
    python sample_data/tools/make_sequences.py
"""
import json
from pathlib import Path

SEQUENCES = [
    ("cheese-board", "My grandmother put a plate of sharp cheese and warm bread on the kitchen table. The cat watched every crumb."),
    ("cheesecake-party", "For the party we baked a lemon cheesecake and a chocolate cake. The cheesecake was gone before the cake was even cut."),
    ("cheese-cake-spelling", "Is it cheese cake or cheesecake? My aunt writes it as two words, but she still bakes the best cake in the family."),
    ("rainy-kitchen", "Rain drummed on the window while the soup simmered on the stove. I made a pot of tea and opened my book."),
    ("beach-morning", "We drove the car to the beach to watch the sun come up. A dog ran into the waves, and a bird stood on a post in the wind."),
    ("river-horse", "A grey horse grazed by the river, where a man was trying to catch a fish. The water was green and slow in the evening light."),
    ("snow-school", "Snow closed the school for three days. The children built a snowman in the garden and gave him a red scarf."),
    ("pizza-night", "Every Friday we eat pizza and listen to music. Ten minutes after it arrives, there is nothing left but a little cheese on the box."),
    ("moon-garden", "The moon rose over the garden, and a single blue flower shone in its light. Somewhere a cat was walking along the fence."),
    ("morning-coffee", "Coffee for my father, tea for my mother, and an apple for me: that was breakfast on a school day. The dog got the crusts of the bread."),
    ("bakery-window", "The bakery window was full of cupcakes, cheesecakes, and a tall chocolate cake. I bought a loaf of bread and a slice of cheesecake for the walk home."),
    ("flower-market", "On a windy morning I bought a red flower, three green apples, and a book about birds. The sun came out as I crossed the river."),
]


def main():
    out = Path(__file__).resolve().parent.parent / "sequences.jsonl"
    assert len(SEQUENCES) == 12 and len({i for i, _ in SEQUENCES}) == 12
    with out.open("w", encoding="utf-8") as f:
        for sid, text in SEQUENCES:
            f.write(json.dumps({"id": sid, "text": text}, ensure_ascii=False) + "\n")
    print(f"wrote {out.name}: {len(SEQUENCES)} sequences")


if __name__ == "__main__":
    main()

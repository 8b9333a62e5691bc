"""Write group pictures composed from real LFW faces, for trying multi-face indexing by hand.

Each picture pastes 2-6 faces of different people (LFW's deep-funneled photos, central 60%
cut out, 60-150 px) at random non-overlapping places on a 480x640 gradient canvas
(`facelab.data.groups.compose_group`); `truth.json` lists each picture's faces: the source
photo (so the person) and the pasted box. Seeded, so the same command writes the same set.

    PYTHONPATH=$PWD/src python3 scripts/compose_groups.py --count 50 --out runs/groups
    PYTHONPATH=$PWD/src python3 -m facelab index runs/groups --library runs/groups.db
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from facelab.data.groups import compose_group

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lfw", type=Path, default=LFW)
    parser.add_argument("--out", type=Path, default=Path("runs/groups"))
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    people = sorted(p for p in (args.lfw / "images").iterdir() if p.is_dir())
    args.out.mkdir(parents=True, exist_ok=True)
    truth = {}
    for n in range(args.count):
        chosen = rng.choice(len(people), int(rng.integers(2, 7)), replace=False)
        photos = [sorted(people[i].glob("*.jpg"))[0] for i in chosen]
        group = compose_group(photos, rng, sizes=(60, 150))
        name = f"group_{n:04d}.jpg"
        Image.fromarray(group.image).save(args.out / name, quality=92)
        truth[name] = [asdict(face) for face in group.faces]
    (args.out / "truth.json").write_text(json.dumps(truth, indent=1))
    print(json.dumps({"out": str(args.out), "pictures": args.count}))


if __name__ == "__main__":
    main()

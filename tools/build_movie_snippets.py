"""Rebuild alignkit/tasks/data/movie_snippets.jsonl.gz from the vaderSentiment 3.3.2 sdist.

    pip download --no-binary :all: --no-deps vaderSentiment==3.3.2
    python tools/build_movie_snippets.py vaderSentiment-3.3.2.tar.gz

One JSON object per snippet: id, text, mean (the mean human rating, -4..4) and
ratings (each rater's score, 15 to 29 of them). Source: additional_resources/
hutto_ICWSM_2014.tar.gz inside the sdist (MIT, Hutto & Gilbert, ICWSM 2014).
"""

import gzip
import io
import json
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "alignkit/tasks/data/movie_snippets.jsonl.gz"


def main(sdist: str) -> None:
    with tarfile.open(sdist) as outer:
        inner_bytes = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        def lines(name):
            return inner.extractfile(f"hutto_ICWSM_2014/{name}").read().decode("utf-8").splitlines()
        truth = [line.split("\t", 2) for line in lines("movieReviewSnippets_GroundTruth.txt") if line.strip()]
        ratings = {}
        for line in lines("movieReviewSnippets_anonDataRatings.txt"):
            if line.strip():
                sid, _, _, raw = line.split("\t", 3)
                ratings[sid] = json.loads(raw)
    rows = [{"id": int(sid), "text": text.strip().replace("''", '"'), "mean": round(float(mean), 4),
             "ratings": ratings[sid]} for sid, mean, text in truth]
    # mtime=0: the same input gives byte-identical output.
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    print(f"{len(rows)} snippets -> {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(sys.argv[1])

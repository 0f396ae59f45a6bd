#!/usr/bin/env python3
"""Export scikit-learn's bundled toy data sets as plain CSV files.

Writes data/sklearn/{iris,wine,breast_cancer,digits}.csv (relative to the
repository root, regardless of the current directory):

* header row: the feature names made CSV/identifier-safe (lowercase, every
  character outside [a-z0-9_] -> '_', repeated '_' collapsed, leading and
  trailing '_' stripped), followed by a final column named ``target``;
* iris, wine, breast_cancer: features written with Python's float repr
  (shortest round-trip form, e.g. ``5.1``), target = class name
  (e.g. ``setosa``, ``class_0``, ``malignant``);
* digits: 8x8 pixel intensities written as integers 0..16, target = the
  digit 0..9 as an integer.

Lines end with '\\n'. Requires scikit-learn and numpy.

Usage: python3 scripts/make_sklearn_csvs.py
"""

import os
import re
import sys

from sklearn import datasets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO_ROOT, "data", "sklearn")


def safe_name(name):
    s = str(name).lower()
    s = re.sub(r"[^a-z0-9_]", "_", s)
    s = re.sub(r"_+", "_", s)
    return s.strip("_")


def fmt_float(v):
    return repr(float(v))


def fmt_int(v):
    f = float(v)
    if not f.is_integer():
        raise ValueError("expected an integer value, got %r" % f)
    return str(int(f))


def write_csv(path, header, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(",".join(header) + "\n")
        for row in rows:
            fh.write(",".join(row) + "\n")
    os.replace(tmp, path)


def export(stem, bunch, class_names):
    header = [safe_name(n) for n in bunch.feature_names]
    if len(set(header)) != len(header):
        raise ValueError("%s: sanitized feature names collide: %r" % (stem, header))
    if "target" in header:
        raise ValueError("%s: a feature is already named 'target'" % stem)
    header.append("target")

    fmt = fmt_float if class_names else fmt_int
    rows = []
    for x, y in zip(bunch.data, bunch.target):
        cells = [fmt(v) for v in x]
        cells.append(str(bunch.target_names[y]) if class_names else str(int(y)))
        rows.append(cells)

    path = os.path.join(OUT_DIR, stem + ".csv")
    write_csv(path, header, rows)
    print("%-20s %5d rows x %3d columns (%d features + target)"
          % (os.path.relpath(path, REPO_ROOT), len(rows), len(header), len(header) - 1))


def main():
    import sklearn

    os.makedirs(OUT_DIR, exist_ok=True)
    print("scikit-learn %s" % sklearn.__version__)
    export("iris", datasets.load_iris(), class_names=True)
    export("wine", datasets.load_wine(), class_names=True)
    export("breast_cancer", datasets.load_breast_cancer(), class_names=True)
    export("digits", datasets.load_digits(), class_names=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

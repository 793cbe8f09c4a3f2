"""Attention speed and memory benchmark (same as ``sbmt bench attention``).

See :mod:`sbm_transformer.bench`.

Full run (about 20 minutes on 2 cores) writing the report and plot under docs/:

    python benchmarks/attention.py --out docs/benchmarks.md --plot docs/benchmarks.png
"""

from sbm_transformer.bench import main

if __name__ == "__main__":
    main()

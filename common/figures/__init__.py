"""The lecture's claims as figures: one module per figure, each with `make(path) -> numbers`.

`python -m common.figures` (or `make figures`) draws every figure to `results/figures/` and writes
`results/figures/README.md` with each caption and the numbers behind it; `python -m common.figures bcq ope`
draws only those. The small MDPs and toy environments the figures need live here too (`tabular.py`,
`toy_control.py`). This is a tool beside `common/`'s core: it may import `common/` and the algorithm files;
they never import it.
"""

"""The comparison study behind study.py: every model trained with one recipe, validated, exported to ONNX (float and
INT8), timed in one interleaved ONNX Runtime run, and reported as a table, a csv and an accuracy-latency plot.

pipeline: options, training (resumable), validation and export per model, the timing run, the run itself;
report: the rows, the Pareto front, study.md / study.csv / study.png; peers: the optional Ultralytics rows.
"""

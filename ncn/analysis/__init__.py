"""Analysis of trained models and finished runs: figures and the statistics the reports state.

Owns what turns numbers into findings: `plots` (signal heatmaps, loss curves) and `statistics`
(means with 95 % t-intervals, paired and Welch differences). May import the model (for signal
names and ranges) and the shared floor (`ncn.config`, `ncn.errors`), never training, tracking or
a task; matplotlib and scipy are imported where a figure or an interval is made.
"""

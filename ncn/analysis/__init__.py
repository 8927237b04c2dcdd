"""Analysis of trained models and finished runs: figures and the statistics the reports state.

Owns what turns numbers into findings: `plots` (signal heatmaps, loss curves), `statistics`
(means with 95 % t-intervals, paired and Welch differences) and `sample_efficiency` (the
reference's SEI, power-law fits, tokens-to-target and efficiency ratios, the reference's log
format). May import the model (for signal names and ranges) and the shared floor (`ncn.config`,
`ncn.errors`), never training, tracking or a task; matplotlib, pandas and scipy are imported
where a figure, a smoothing, a fit or an interval is made.
"""

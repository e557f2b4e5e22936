"""The comparison lab: compare methods, sweep LoRA settings, measure forgetting,
and aggregate run directories into results.json, results.csv and report.html."""

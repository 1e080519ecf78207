"""Evaluation: perplexity and benchmark tasks on checkpoints, sandboxed code execution, arena ratings,
contamination against the run's lineage, and the model card.

    ember eval --run=runs/quickstart --preset=quickstart    # results.json + report.md in <run>/eval/
    ember card --run=runs/quickstart                        # MODEL_CARD.md from the run's lineage
"""

"""The synthetic tabletop world: procedural scenes with exact boxes and masks
(``scenes``), the samples of every task asked about them in the model's answer
format, with the grammar of their referring expressions and the task list
(``samples``), and the held-out evaluation over them (``evaluate``).

Training, scoring of synthetic truth, the demo and the export's parity inputs
share it; the runtime path (predictor, service, node) never imports it.
"""

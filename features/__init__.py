"""Feature discovery: mining the store through each SAE, examples, explanations and scores,
the logit lens, the feature tables and the static report.

Imports from `activations` and `sae`; never from `steering` or `pipeline`."""

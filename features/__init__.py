"""Feature mining, labelling, reports, steering vectors and the steering runner (issues 4 and 5).

May import from `sae` and `pipeline`; neither imports from here."""

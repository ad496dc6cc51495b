"""Record-level differential privacy for what a site releases: one image is the privacy unit.

Clipping bounds each image's contribution (`sensitivity`), the Gaussian mechanism adds calibrated
noise (`mechanism`, `accounting`), the site's own policy and ledger decide whether a release happens
at all (`policy`, `ledger`), and the server only post-processes what it receives (`postprocess`).
"""

"""The pure core: config, normalisation, pricing, match and classification. No I/O."""

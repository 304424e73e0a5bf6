"""Models: paths in the one store, downloads, the verified record, extra_model_paths.yaml,
workflow references and the per-instance listing check."""

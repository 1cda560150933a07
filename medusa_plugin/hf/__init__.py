"""Medusa on Hugging Face transformers models: the reference decoder (:mod:`.generate`), head training
(:mod:`.train`) and tree fitting (:mod:`.fit_tree`)."""

"""A model server speaking the TensorFlow Serving API over a registry folder (TF Serving itself cannot be installed
here). Written in TF Serving's vocabulary: a *source* emits the aspired versions of each model, a *manager* loads and
unloads *servables* to match without ever dropping availability."""

"""Batch training job: photos in, evaluated and versioned TensorFlow SavedModels out, published to the registry."""

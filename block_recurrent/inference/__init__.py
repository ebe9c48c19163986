"""Running a trained model: exact cached decoding, sampling and generation, streaming evaluation."""

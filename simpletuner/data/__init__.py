"""Datasets: multidatabackend.json, storage, captions, buckets, sampling and batches."""

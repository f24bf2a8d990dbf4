"""The HTTP inference service: FastAPI around ``model.Detector`` with dynamic batching."""

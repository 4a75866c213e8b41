"""The web app of a trained run (FastAPI + uvicorn, the ``serve`` extra): a page and a JSON API."""

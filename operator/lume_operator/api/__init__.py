"""The API: pydantic models of the three kinds and their statuses, and the CRDs made from them."""

"""Data: locate and check files, read them with Ray Data, fit and apply preprocessing."""

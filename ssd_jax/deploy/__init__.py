"""Deployment: the Detector on images of any size, export, drawing."""

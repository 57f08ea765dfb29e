"""Differentiable rendering helpers (camera rays, volume rendering) for the INR models."""

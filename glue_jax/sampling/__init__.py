"""Samplers (Euler-Maruyama SDE, Heun ODE) and guidance; pure and compiled."""

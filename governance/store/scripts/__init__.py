"""Lua scripts of the store, shipped as package data and registered once per client."""

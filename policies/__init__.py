"""Vision-language policies for the tabletop environments (camera image + instruction -> skill command).

The scripted literal executor used to validate the environments lives in :mod:`envs.oracle`.
"""

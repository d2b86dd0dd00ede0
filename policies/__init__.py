"""Vision-language policies for the tabletop environments (camera image + instruction -> skill command).

:mod:`policies.codec` turns skill commands into text in the image's pixel frame and back. The scripted literal
executor used to validate the environments lives in :mod:`envs.oracle`.
"""

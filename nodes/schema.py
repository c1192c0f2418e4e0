"""What the pack's node schemas share: where the nodes sit, the story socket type, a shared default.

Node modules import these from here, never from each other.
"""
from comfy_api.v0_0_2 import io

CATEGORY = "Consistent Story"  # where every node of the pack sits in the node library

# The parsed story (nodes/story/story_prompts.Story), for nodes that need the characters of each panel.
StoryType = io.Custom("CONSISTENT_STORY")

DEFAULT_IDENTITY_PANELS = 2  # the official app's default id_length, on Story Prompts and Consistent Self-Attention

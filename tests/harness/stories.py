"""Stories the tests share."""

# Two characters, an [NC] panel and a two-character panel: 7 panels (0-based), identity panels
# (2 each) Bob 0, 2 and Alice 1, 5.
BOB_AND_ALICE = """
[Bob] a man in a red coat
[Alice] a woman in a green dress
[Bob] walks in the park
[Alice] reads a book
[Bob] runs to the station
[NC] a quiet forest at dawn
[Bob] and [Alice] talk at a cafe
[Alice] sleeps on the sofa
[Bob] eats an apple
"""

# BOB_AND_ALICE at a glance ("No style", identity_panels 2, the whole story), written by hand: Story
# Prompts' summary output, the server's /consistent_story/summary rows and the editor's view.
BOB, ALICE = "a man in a red coat", "a woman in a green dress"
BOB_AND_ALICE_AT_A_GLANCE = [
    "7 panels · 2 characters",
    "identity panels: Bob 1, 3; Alice 2, 6",
    f"1. identity of Bob, reads 3: {BOB} walks in the park",
    f"2. identity of Alice, reads 6: {ALICE} reads a book",
    f"3. identity of Bob, reads 1: {BOB} runs to the station",
    "4. no character, reads nobody: a quiet forest at dawn",
    f"5. reads Bob 1, 3; Alice 2, 6: {BOB} and {ALICE} talk at a cafe",
    f"6. identity of Alice, reads 2: {ALICE} sleeps on the sofa",
    f"7. reads Bob 1, 3: {BOB} eats an apple",
]

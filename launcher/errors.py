"""The two kinds of error a user can cause, by the exit status the command line gives them.

    InputError   exit 2: a spec, a file, a name or a folder the user gave cannot be used as it is
    WorkFailed   exit 1: the input was fine but the work could not be done (a scheduler refusal, a full disk,
                 a run held by another process, a diverging loss)

Each message is one paragraph naming the culprit; anything else that is raised is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Exit status 2."""


class WorkFailed(Exception):
    """Exit status 1."""

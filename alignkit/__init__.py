"""alignkit: align language models with human preferences.

`import alignkit` stays light; heavy pieces are imported by the commands that need them.
"""

__version__ = "0.1.0"

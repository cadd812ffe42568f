"""Configs of `alignkit app`, of a campaign file, and of `alignkit export` (YAML + `--key value`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AppConfig:
    """The labelling and arena web server."""

    output_dir: str = "runs/app"
    """Folder of the default SQLite database (app.db)."""
    database: str = ""
    """SQLAlchemy URL: sqlite:///path.db or postgresql://user@host/db; empty = sqlite in output_dir."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 to serve other machines)."""
    port: int = 8000
    secret_env: str = "ALIGNKIT_APP_SECRET"
    """Environment variable holding the session-signing secret (>= 32 random characters; never in a file)."""
    secure_cookies: bool = False
    """Send the session cookie over HTTPS only (set it when serving behind TLS)."""
    admin: str = "admin"
    """Admin account, created at the first start with the password in $ALIGNKIT_ADMIN_PASSWORD."""
    annotators: list[str] = field(default_factory=list)
    """Annotator accounts to create at start (new ones print their invite link once)."""
    campaigns: list[str] = field(default_factory=list)
    """Campaign YAML files; each is created at start if no campaign has its name."""
    arena: list[str] = field(default_factory=list)
    """Arena contestants: name=checkpoint_dir, name=openai:MODEL@URL or name=openai-chat:MODEL@URL."""
    arena_prompts: str = ""
    """Prompt records battles draw from (a voter may also type a prompt); empty = typed prompts only."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint contestants' API key."""
    max_new_tokens: int = 64
    """Arena: new tokens per answer."""
    temperature: float = 1.0
    """Arena: sampling temperature."""
    lease_minutes: float = 60.0
    """An item shown but not judged within this time goes back to the pool."""
    bootstrap_rounds: int = 200
    """Resamples for the leaderboard's Bradley-Terry intervals."""
    seed: int = 0
    """Seed of the leaderboard's bootstrap and Elo order."""


@dataclass
class CampaignConfig:
    """A labelling campaign: a prompt set with responses from checkpoints, or uploaded responses."""

    name: str = ""
    """Unique name (letters, digits, - _ .)."""
    kind: Literal["pairwise", "rank", "thumbs"] = "pairwise"
    """pairwise: A / B / tie / both bad; rank: order K answers; thumbs: up / down on one answer."""
    guidelines: str = ""
    """Markdown shown above every item: the text itself, or a path to a .md file."""
    overlap: int = 1
    """Annotators per item (>= 2 gives agreement figures)."""
    annotators: list[str] = field(default_factory=list)
    """Accounts allowed to label it (admins always are)."""
    responses: str = ""
    """Uploaded responses: ranking records (prompt, responses[, models]) for pairwise/rank, or
    prompt/completion records (+ optional model) for thumbs. Exclusive with `models`."""
    prompts: str = ""
    """With `models`: prompt records to generate responses for."""
    models: list[str] = field(default_factory=list)
    """Checkpoints (name=path) whose sampled responses are stored once at creation."""
    samples_per_model: int = 1
    """Responses per model and prompt (responses per item = models x samples; thumbs: one item each)."""
    num_prompts: int = 0
    """Use the first N prompts / records (0 = all)."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    """Sampling seed."""


@dataclass
class ExportConfig:
    """Stream a campaign's judgements as a training file."""

    database: str = ""
    """SQLAlchemy URL of the app's database (e.g. sqlite:///runs/app/app.db)."""
    campaign: str = ""
    """Campaign name."""
    format: Literal["dpo", "rm", "kto", "ranking"] = "dpo"
    """dpo / rm: prompt, chosen, rejected pairs (a rank-K judgement gives K(K-1)/2); kto: prompt,
    completion, label from thumbs; ranking: prompt, responses best first."""
    output: str = ""
    """Output JSONL file."""

"""Human feedback in the browser: labelling campaigns, a blind arena, and export to training files.

    alignkit app --config app.yaml                      # the web server (docs/app.md)
    alignkit export --database sqlite:///runs/app/app.db --campaign demo --format dpo --output pairs.jsonl

Nothing below `alignkit.app` is imported by `import alignkit` or by any trainer; FastAPI,
SQLAlchemy and the `openai` client load only when these commands run.
"""

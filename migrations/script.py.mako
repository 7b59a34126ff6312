"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Keep every transform this revision needs inside this file: never import
iommupt_store (the package moves on; a revision must keep doing what it did).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
% if imports:
${imports}
% endif

revision: str = ${repr(up_revision)}
down_revision: str | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}

#: True when upgrade() or downgrade() reads rows (op.get_bind()): 'db upgrade --sql' then refuses it
data_migration = False


def would_lose(conn: sa.Connection) -> list[str]:
    """One line per kind of data downgrade() would drop (empty: lossless); 'db downgrade' refuses
    a loss unless --force."""
    return []


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}

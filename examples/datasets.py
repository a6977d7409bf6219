"""The data set converters now live in :mod:`regrad_engine.datasets.converters`; this module
keeps the examples' import path and command line.

    python examples/datasets.py pubmedqa --out runs/examples/medical/data
"""

from __future__ import annotations

import sys

from regrad_engine.datasets.converters import (  # noqa: F401  (re-exported for the example bots)
    BUILDERS,
    SPLITS,
    DatasetError,
    _long_date,
    cuad,
    cuad_contract_name,
    legal,
    main,
    policyqa,
    pubmedqa,
    shared_data_dir,
    split_documents,
    write_data_dir,
)

if __name__ == "__main__":
    sys.exit(main())

"""Packaging for rmilter: ``pip install .`` makes ``twistd rmilter`` and ``rmilter check-config`` work."""
from setuptools import find_packages, setup

setup(
    name="rmilter",
    version="3.0.0.dev0",
    description="Milter for Postfix/Sendmail: Rspamd, ClamAV, Redis greylisting and rate limits, DKIM (Twisted)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-2-Clause",
    python_requires=">=3.9",
    packages=find_packages(include=["rmilter", "rmilter.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["rmilter_plugin.py", "rmilter_endpoints.py"]},
    install_requires=[
        "twisted>=22.10",
        "txredisapi>=1.4.10",
        "dkimpy>=1.1",
        "treq>=22.1",
        "service-identity>=21.1",
        "cryptography>=3.1",
        "xxhash>=3.0",
        "hiredis>=2.0",
        "zstandard>=0.19",
    ],
    extras_require={"test": ["hypothesis>=6.0"], "dev": ["hypothesis>=6.0", "mypy"]},
    entry_points={"console_scripts": ["rmilter=rmilter.cli:main"]},
    data_files=[("share/rmilter", ["rmilter.conf.sample", "rmilter.tac"])],
    classifiers=[
        "Framework :: Twisted",
        "Topic :: Communications :: Email :: Filters",
        "Programming Language :: Python :: 3",
    ],
)

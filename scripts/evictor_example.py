"""The evictor API in a few lines: an LRU evictor deciding what leaves a 1 KiB cache."""

from collections import OrderedDict

from lmtier.evictor import LRUEvictor, PutStatus


def main() -> None:
    evictor = LRUEvictor(max_cache_bytes=1024)
    cache: OrderedDict[str, bytes] = OrderedDict()
    for i in range(6):
        key, value = f"chunk-{i}", bytes(300)
        evict_keys, status = evictor.update_on_put(cache, evictor.get_size(value))
        if status is PutStatus.LEGAL:
            for victim in evict_keys:
                evictor_size = evictor.get_size(cache.pop(victim))
                print(f"evicted {victim} ({evictor_size} B)")
            cache[key] = value
        evictor.update_on_get("chunk-0", cache)  # keep chunk-0 hot
    print(f"resident: {list(cache)}; charged {evictor.charged_bytes} of {evictor.capacity_bytes} B")


if __name__ == "__main__":
    main()

"""Writes the seed inputs (flags, u16 query length, query, answer) for the
dns_messages target: python3 make_seeds.py (from dnsproxy/fuzz)."""
import struct

def name(n):
    out = b""
    for label in n.strip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\x00"

def header(id, flags, qd, an, ns, ar):
    return struct.pack(">HHHHHH", id, flags, qd, an, ns, ar)

def question(n, qtype=1):
    return name(n) + struct.pack(">HH", qtype, 1)

def opt(payload=1232, do=False):
    return b"\x00" + struct.pack(">HHIH", 41, payload, 0x8000 if do else 0, 0)

def rr(n, rtype, rdata, ttl=300):
    return (name(n) if isinstance(n, str) else n) + struct.pack(">HHIH", rtype, 1, ttl, len(rdata)) + rdata

def query(n, qtype=1, edns=True, opcode=0, id=0x1234):
    return header(id, (opcode << 11) | 0x0100, 1, 0, 0, 1 if edns else 0) + question(n, qtype) + (opt() if edns else b"")

def seed(path, q, a=b"", flags=0):
    open(path, "wb").write(bytes([flags]) + struct.pack(">H", len(q)) + q + a)

q = query("a.example")
chain = (header(0x1234, 0x8180, 1, 4, 0, 1) + question("a.example")
         + rr(b"\xc0\x0c", 5, name("c.b.example"))  # owner: a pointer to the question's name
         + rr("c.b.example", 5, name("d.b.example"))
         + rr("d.b.example", 1, bytes([198, 18, 0, 1]))
         + rr("d.b.example", 1, bytes([198, 18, 0, 2]))
         + opt())
seed("seeds/cname-chain.bin", q, chain)
aaaa = (header(0x1234, 0x8180, 1, 1, 0, 0) + question("a.example", 28)
        + rr("a.example", 28, bytes.fromhex("20010db8000000000000000000000001")))
seed("seeds/aaaa.bin", query("a.example", 28), aaaa)
seed("seeds/blocked.bin", query("x.test"))
seed("seeds/axfr.bin", query("a.example", 252))
seed("seeds/notify.bin", query("a.example", opcode=4))
seed("seeds/two-questions.bin", header(1, 0x0100, 2, 0, 0, 0) + question("a.example") + question("b.example"))
big = header(0x1234, 0x8180, 1, 60, 0, 0) + question("x.b.example")
for i in range(60):
    big += rr(b"\xc0\x0c", 1, bytes([198, 18, 1, i]))
seed("seeds/large-no-edns.bin", query("x.b.example", edns=False), big)
nx = header(0x1234, 0x8183, 1, 0, 0, 0) + question("y.b.example")
seed("seeds/nxdomain.bin", query("y.b.example"), nx)
seed("seeds/matched-random.bin", query("a.example"), bytes(range(40)), flags=1)

//! steps, in Zig: input {"n": N}. Calls kv.incr("counter", 1) N times and keeps a
//! running sum of the answers in locals, which must survive every hibernation at a
//! tool call. With a fresh store and n = 200: {"sum": 20100, "last": 200}.
const torpor = @import("torpor");

pub fn main() !void {
    const input = torpor.input(struct { n: u32 }) catch
        return torpor.fail("input needs a non-negative integer \"n\"", .{});
    defer input.deinit();

    var sum: i64 = 0;
    var last: i64 = 0;
    for (0..input.value.n) |i| {
        last = torpor.kv.incr("counter", 1) catch |err| { // may hibernate here
            const f = torpor.lastFailure().?;
            return torpor.fail("kv.incr failed at step {d}: {s}: {s}", .{ i, @errorName(err), f.message });
        };
        sum += last;
    }
    try torpor.output(.{ .sum = sum, .last = last });
}
